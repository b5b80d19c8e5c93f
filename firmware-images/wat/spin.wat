;; spin: abusive guest whose tick never returns (infinite loop). Must be interrupted by the CPU budget.
(module
  (memory (export "memory") 1)
  (func (export "tick") (loop $l (br $l))))
