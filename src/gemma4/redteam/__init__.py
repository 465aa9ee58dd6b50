"""Adversarial testing (issue 15): attack families, targets (an in-process model or any OpenAI-compatible
endpoint), scorers and reports with Wilson intervals; garak reports read into the same table."""
