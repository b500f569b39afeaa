"""Quiet-STaR: token-parallel thoughts after every token, learned <sot>/<eot>, a mixing head, REINFORCE with teacher forcing."""
