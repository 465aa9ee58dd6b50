"""Safety alignment inside the training loss (issue 15): curated data with placeholder harms, the exact
judge, a ShieldGemma-style safety classifier built on our model, and the alignment stages (safety SFT,
DPO with an NLL anchor, the Lagrangian-constrained stage, GRPO-Lagrangian) run on the training loop.

The losses themselves live in `gemma4.train` (they are ordinary training objectives); this package holds
what is specific to safety: the data, the judges and the stage recipes."""
