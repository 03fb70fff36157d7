"""Test-only: let accelerate run FSDP2 on CPU processes (gloo), so the FSDP path is tested on a CPU machine.

accelerate 1.16 keeps an FSDP plugin only for GPU-like distributed types (accelerate/state.py,
`AcceleratorState.__init__`): under MULTI_CPU it drops the plugin and the Trainer silently trains
plain DDP. torch's `fully_shard` itself works on CPU with gloo. This wrapper, active only when
FLYWHEEL_TEST_CPU_FSDP=1 and this folder is on PYTHONPATH, restores the plugin after that check.
The product never imports it; bench/gpu_fsdp_check.sh checks the same path unpatched on GPUs.
"""

import os

if os.environ.get("FLYWHEEL_TEST_CPU_FSDP") == "1":
    import accelerate.state as _state
    from accelerate.utils import DistributedType

    _original = _state.AcceleratorState.__init__

    def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
        _original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _keep_fsdp_on_cpu
