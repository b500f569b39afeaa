"""lm-evaluation-harness task YAMLs with this project's zero-shot prompts and answer extraction (``evaluation.tasks``).

    quietstar_gsm8k        generate_until: greedy answer after "Q: ...\\nA:", cut at a newline; exact_match
    quietstar_gsm8k_score  loglikelihood of " {gold}" after the prompt; score (P of gold) and gold_logprob
    quietstar_csqa         multiple_choice over the letters " A" .. " E"; acc (argmax letter) and score
                           (P of the gold letter renormalised over the letters)

Each reads a local jsonl (``dataset_path: json``) named relative to the working directory;
``quietstar lm-eval --data-dir DIR`` writes copies that name ``DIR``'s files by absolute path
(``evaluation.lm_eval_cli``). ``answers.py`` holds the functions the YAMLs name with ``!function``.
"""
