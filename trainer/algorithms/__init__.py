"""One module per algorithm family; each exports its config dataclasses in ``SCHEMAS`` (trainer/config.py
registers them as ``algorithm/schema_<name>``) and its ``Algorithm`` subclasses (the ``_target_`` of
conf/algorithm/<name>.yaml)."""
