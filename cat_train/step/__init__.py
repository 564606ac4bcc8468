"""One CAT step: the model as the trainer sees it, the objective, and the plug points the step calls.

    denoiser.py   the Denoiser protocol (module, predict, prediction type) and the DDPM and flow schedules
    conds.py      conditionings batched as ComfyUI batches them (contexts of different lengths)
    objective.py  cat_objective: the CAT loss of one batch, the only objective
    plugs.py      the plug points: Adapter (what is trained) and the term roles BatchTerm, LossTerm, RunHook
    cancel.py     cancel points inside one step's long work (preview rounds, measurements), and the host's check

Imports nothing else of the method: every other part builds on it, so it stays small and knows no plug-in.
"""
