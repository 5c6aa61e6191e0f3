"""Model families: each is a config dataclass beside its model class (transformer.py, rnn.py,
lm.py, encoder.py), built from layers.py. `transduce.registry` maps `model.family` to the pair."""
