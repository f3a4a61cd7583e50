"""Using a trained adapter: the saved bundle (adapter, labels, tokenizer, model card), loading it onto its base,
batched forward passes, evaluate, predict and export. Imports modeling, data, hardware and the floors below;
never training."""
