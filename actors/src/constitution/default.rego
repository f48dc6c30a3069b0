# The default constitution of SomaAgent, rule by rule (docs/constitution.md explains each).
# A decision reads `input` (the DecisionInput: tenant, principal, actor, action, resource,
# context) and `data` (this constitution's data document, default.json).
#
# A constitution defines, in package `soma`, any of:
#   deny contains <reason> if ...      any reason denies
#   escalate contains <reason> if ...  any reason (and no deny) waits for a human approval
#   allow if ...                       allows when nothing denies or escalates
# Nothing that no rule allows is allowed.
package soma

# 1. Nothing crosses tenants.
deny contains "the resource belongs to another tenant" if {
	input.resource.tenant
	input.resource.tenant != input.tenant
}

# 2. A suspended tenant does nothing.
deny contains "the tenant is suspended" if input.context.suspended == true

# 3. Model calls stop when the budget is spent ...
deny contains "the tenant's budget is spent" if {
	input.action == "model.generate"
	input.context.budget_left <= 0
}

# 4. ... or the daily token quota is used up (the tenant's quota, else data.limits).
deny contains sprintf("the daily token quota of %d is used up", [quota]) if {
	input.action == "model.generate"
	quota := object.get(input.context, "tokens_per_day", data.limits.tokens_per_day)
	input.context.tokens_today >= quota
}

# 5. Only the tools the tenant allows run.
deny contains sprintf("tool %s is not allowed", [input.resource.tool]) if {
	input.action == "tool.call"
	not input.resource.tool in data.tools.allowed
}

# 6. Some tools wait for a human approval.
escalate contains sprintf("tool %s needs a human approval", [input.resource.tool]) if {
	input.action == "tool.call"
	input.resource.tool in data.tools.approval
}

# 7. An agent may not erase memory; a user may.
deny contains "agents may not erase memory" if {
	input.action == "memory.erase"
	input.principal.kind == "agent"
}

# 8. What is allowed.
allow if input.action in data.actions.allowed
