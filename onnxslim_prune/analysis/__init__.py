"""Analysis of a model that knows no method: trace (channel groups), score, plan and apply."""
