"""The embedded default: a tiny LLaMA built offline (tiny.py) and a movie-review task with a rule-based objective
(task.py). Not part of the product: it exists so that `make ppo` and the tests run offline on CPU."""
