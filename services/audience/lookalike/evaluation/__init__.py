"""Seed-holdout evaluation of lookalike rankings against random, activity and logistic regression.

``targets`` builds the targets (MovieLens genres, Taobao categories, generated segments) through
the project's adapters; ``protocol`` runs the methods on them; ``metrics`` holds AUC, bootstrap
intervals and lift; ``report`` prints the table. ``bench/lookalike_eval.py`` is the command; the
fast version runs in ``tests/audience/test_lookalike_eval.py``.
"""
