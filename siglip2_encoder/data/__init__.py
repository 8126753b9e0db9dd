"""Data going into the models: ``images`` (decoding files safely), ``processor`` (pixels as transformers' SigLIP /
SigLIP 2 processors make them), ``tokenizer`` (texts for the text tower), ``video`` (frames of video files).

Imports: the base modules and ``checkpoints`` (a processor loads its settings from a checkpoint); never ``models``."""
