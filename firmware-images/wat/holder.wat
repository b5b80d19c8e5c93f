;; holder: a ticked workload that asks the agent to hold updates for 60 s through the host API at start
;; ("not now": e.g. a vehicle in motion), and lifts the hold after 5 ticks.
(module
  (import "flotilla" "hold" (func $hold (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "vehicle in motion")
  (global $n (mut i32) (i32.const 0))
  (func (export "_initialize")
    (drop (call $hold (i32.const 0) (i32.const 17) (i32.const 60))))
  (func (export "tick")
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (if (i32.eq (global.get $n) (i32.const 5))
      (then (drop (call $hold (i32.const 0) (i32.const 0) (i32.const 0)))))))
