;; trap: abusive guest whose tick executes `unreachable`.
(module
  (memory (export "memory") 1)
  (func (export "tick") unreachable))
