"""The engine: a run assembled from its config, trained, checkpointed, evaluated.

assemble.py   Run: config -> data, labeled subset, method, optimizer, pipeline
loop.py       train(run) -> train_one_epoch(...) -> step(...)
state.py      checkpoint contents, restore, compatibility, checkpoint files
rundir.py     the run directory's files; start_or_resume
evaluate.py   evaluation of a run; load_trained
export.py     load_backbone; export_backbone to torchvision, timm, safetensors
protocols.py  kNN, linear probe, fine-tuning, raw-pixel baseline
api.py        suncet.train(...) -> RunResult
"""
