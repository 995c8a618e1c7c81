"""The synthetic curriculum that trained ``models/qwen2vl-synth`` from scratch: ``data`` (the generator),
``scratch`` (tokenizer and random model), ``curriculum`` (the three-stage run). See README.md and LOG.md here."""
