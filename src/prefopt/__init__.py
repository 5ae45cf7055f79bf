"""prefopt: Direct Preference Optimization and its family for causal language models.

Read in pipeline order: `prefopt.data` (formats) → `prefopt.tokenize` → `prefopt.collate` →
`prefopt.logprobs` → `prefopt.losses` (pure maths) → `prefopt.step` → `prefopt.trainer`.
"""

__version__ = "0.1.0"
