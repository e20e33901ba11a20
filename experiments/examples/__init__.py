"""Extension examples: a learner and a mixer of your own (docs/extending.md)."""
