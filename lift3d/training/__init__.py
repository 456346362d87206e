"""Training our own Zero123-family model on a CPU: multi-view data generation (:mod:`.data`,
:mod:`.shapes`), presets (:mod:`.arch`), the ``lift3d train-zero123`` trainer (:mod:`.train_zero123`),
novel-view metrics (:mod:`.nvs_eval`)."""
