"""ntkselect.model.loading: loading models, LM heads, adapters, the runtime, memory budgets and the preflight."""
