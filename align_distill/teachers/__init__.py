"""Where a teacher's signals come from at train time: a model in process, the signals cache, or a served model —
one teacher or a weighted / routed mixture of several."""
