"""Networks lossbench registers with timm (importing this package registers them).

``timm.create_model('lossbench_airbench94')`` etc. work after ``import lossbench.framework.nets``
(``import lossbench.framework`` alone does not import timm, to keep it quick; the trainer's
``--model`` registers them itself).
"""

from .airbench import AirbenchNet, lossbench_airbench94, lossbench_airbench95

__all__ = ["AirbenchNet", "lossbench_airbench94", "lossbench_airbench95"]
