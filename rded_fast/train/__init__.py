"""The student side and observer training: `evaluate` and `relabel` (student.py orders them), `train-observer`
(observer.py), and the modules they share (engine, augment, labels, teacher, val_cache, softlabels, regions,
distilled_set)."""
