# Added to every constitution: gathers its rules into one result (undefined rules are
# empty), so that a decision is one evaluation.
package soma.decide

deny := sort([r | some r in data.soma.deny])

escalate := sort([r | some r in data.soma.escalate])

default allow := false

allow if data.soma.allow == true

result := {"deny": deny, "escalate": escalate, "allow": allow}
