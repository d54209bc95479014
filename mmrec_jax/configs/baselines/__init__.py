"""Transformer baselines of MM-Rec's sizes (`--config=baselines/transformer_tiny`)."""
