"""Continual-learning methods, one module each (finetune, lwf, zscl, wise_ft, mgclip, gnsp), and the
registry that names them (`registry.METHODS`). Evaluation imports only `mgclip_head` from here,
so this package's `__init__` stays empty: importing it never loads the training stack."""
