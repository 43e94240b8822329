"""Datasets in the CoOp layout, few-shot splits, transforms and loaders."""
