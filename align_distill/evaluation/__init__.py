"""`align-distill evaluate`: generate answers of one or more models on a prompt set and score them (LLM-judge
win-rates, reward models, task checkers), with bootstrap intervals."""
