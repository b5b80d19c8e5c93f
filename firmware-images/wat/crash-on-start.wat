;; crash-on-start: a bad release whose initialisation traps; used to prove rollouts stop and roll back.
(module
  (memory (export "memory") 1)
  (func (export "_initialize") unreachable)
  (func (export "tick")))
