;; membomb: abusive guest that grows its linear memory without bound. Must be stopped at its memory limit.
(module
  (memory (export "memory") 1)
  (func (export "tick")
    (loop $l
      (drop (memory.grow (i32.const 16)))
      (br $l))))
