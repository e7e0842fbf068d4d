"""Between layouts, as one place to import from (the code lives in the modules below; kept for callers):

- parallel/layout.py: names and split rules (TP split dims, pipeline stages, name mapping)
- parallel/weights.py: seeded or given weights into a rank's parameters
- parallel/ds_checkpoint.py: reading DeepSpeed checkpoint tags of any layout
- parallel/engine_state.py: writing a training state into a live engine
"""
from parallel.ds_checkpoint import (OPTIMIZER_NAMES_KEY, TrainingState, _load_ds, _model_states_path,  # noqa: F401
                                    _torch_optimizer_names, checkpoint_layout, pipeline_state_dict, training_state)
from parallel.engine_state import load_training_state, optimizer_param_names  # noqa: F401
from parallel.layout import expected_keys, stage_parameter_names  # noqa: F401
from parallel.weights import full_named_parameters, load_full_state, local_state  # noqa: F401
