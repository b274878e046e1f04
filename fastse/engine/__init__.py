"""The run engine that pretraining (`fastse.pretrain`) and FixMatch (`fastse.semi`) share: optimizers and
schedules (`optim`), torchrun processes (`launch`; their collectives are `fastse.distributed`'s), mixed precision
(`amp`), metrics output (`logging`), run folders (`runs`) and the loop's base (`base.RunTrainer`)."""
