"""Stage 3: fine-tuning (full, frozen-encoder probe, few-shot, QLoRA), baselines and
hyperparameter search on Ray Tune + HyperOpt + ASHA."""
