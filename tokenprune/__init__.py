"""tokenprune: training-free token pruning and merging for pretrained ViTs and VLMs.

    import tokenprune
    tokenprune.apply(model, keep=0.33)          # default method for the model family
    tokenprune.apply(model, "tome", r=13)       # a method with its native option
    tokenprune.last_forward(model).token_counts # what the last forward did
    tokenprune.remove(model)                    # back to the original, bit for bit
    print(tokenprune.check_speed(model, "tome", keep=0.5, batch_size=1))  # does it pay here?
    fast = tokenprune.compiled(model)           # torch.compile as tokenprune times it (CPU: C++ wrapper)
    pipe = tokenprune.pipeline("image-classification", model="google/vit-base-patch16-224", keep=0.5)
    tokenprune.apply(llava, "hiprune", keep=1/3)  # VLMs: visual tokens reaching the language model
"""
# registration side effects: every method, every adapter, the testbed model (vit_testbed_fmnist) with timm
from . import methods as _methods  # noqa: F401
from . import patches as _patches  # noqa: F401
from . import testbed as _testbed  # noqa: F401
from .api import apply, is_patched, last_forward, methods, reducer_of, remove
from .flops import FlopCount, count_flops
from .pipelines import pipeline
from .registry import EncoderReducer, Needs, Reduction, TokenReducer, VisualTokenSelector, register
from .speed import SpeedCheck, check_speed, compiled

__all__ = ["apply", "remove", "methods", "last_forward", "is_patched", "reducer_of",
           "count_flops", "FlopCount", "pipeline", "TokenReducer", "EncoderReducer", "VisualTokenSelector",
           "Reduction", "Needs", "register", "check_speed", "SpeedCheck", "compiled"]
__version__ = "0.1.0"
