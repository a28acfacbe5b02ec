"""ntkselect.model.loading: loading models, LM heads, adapters, the runtime and memory budgets."""
