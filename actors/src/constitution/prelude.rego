# Added to every constitution: gathers its rules into one result (undefined rules are
# empty), so that a decision is one evaluation. Reasons are sets, so they come sorted.
package soma.decide

default deny := set()

deny := data.soma.deny

default escalate := set()

escalate := data.soma.escalate

default allow := false

allow if data.soma.allow == true

result := {"deny": deny, "escalate": escalate, "allow": allow}
