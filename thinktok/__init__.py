"""thinktok: GPT-2 policies that think in tokens of their own."""
