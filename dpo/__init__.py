"""Direct Preference Optimization (DPO) on SmolLM: data, tokenization, log-probs, losses, training."""
