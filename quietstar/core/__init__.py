"""What both methods share: the base model class, model loading and the offline default, typed configs, text data, optimizer groups."""
