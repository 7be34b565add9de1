"""Recipes that build the miniworld's shipped assets: ``train_evaluator`` and ``train_base``."""
