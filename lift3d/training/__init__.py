"""Training our own Zero123-family model on a CPU: multi-view data generation (:mod:`.data`,
:mod:`.shapes`), presets (:mod:`.arch`), the ``lift3d train-zero123`` and ``lift3d train-cascade`` trainers
(:mod:`.train_zero123`, :mod:`.train_cascade`) on one loop (:mod:`.loop`), novel-view evaluation (:mod:`.nvs_eval`)."""
