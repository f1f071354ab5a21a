"""Centralized training: the baseline (`fl-centralized`) and pretraining (`fl-pretrain`)."""
