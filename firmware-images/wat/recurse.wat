;; recurse: abusive guest with unbounded recursion. Must trap on the guest stack limit, not crash the agent.
(module
  (memory (export "memory") 1)
  (func $r (param i64) (result i64) (i64.add (call $r (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))
  (func (export "tick") (drop (call $r (i64.const 0)))))
