# Every Agent and Job is charged to a Budget.
#
# An Agent needs spec.budgetRef. A Job needs spec.budgetRef, or its inline template's
# budgetRef, or (for a Job on an existing Agent) an Agent that has one; the Agent is read from
# the synced inventory. DR-drill Jobs call no model and are exempt.
# Parameters:
#   requireExisting: false   # the Budget must already exist (in the synced inventory)
#
# Layout: see sandbox.rego (`problems`, `fine`, `vm_violation`, `params_typed`, `object_typed`).
package soma.budgetref

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

obj := input.review.object

ns := object.get(obj, ["metadata", "namespace"], object.get(input.review, "namespace", ""))

budgets := object.get(data.inventory, ["namespace", ns, "soma.dev/v1alpha1", "Budget"], {})

agents := object.get(data.inventory, ["namespace", ns, "soma.dev/v1alpha1", "Agent"], {})

named(ref) if {
	is_string(ref.name)
	ref.name != ""
}

problems contains {"msg": msg} if {
	obj.kind == "Agent"
	not named(object.get(obj.spec, "budgetRef", {}))
	msg := sprintf("Agent %q has no spec.budgetRef; every agent's model calls are charged to a Budget: add spec.budgetRef.name (kubectl get budgets -n %s lists them)", [obj.metadata.name, ns])
}

job_budget := obj.spec.budgetRef.name if {
	obj.kind == "Job"
	named(obj.spec.budgetRef)
} else := obj.spec.template.budgetRef.name if {
	obj.kind == "Job"
	named(obj.spec.template.budgetRef)
} else := agents[obj.spec.agentRef.name].spec.budgetRef.name if {
	obj.kind == "Job"
	named(agents[obj.spec.agentRef.name].spec.budgetRef)
}

problems contains {"msg": msg} if {
	obj.kind == "Job"
	not obj.spec.drDrill
	not job_budget
	msg := job_message
}

job_message := sprintf("Job %q has no Budget: set spec.budgetRef.name, or give Agent %q a spec.budgetRef", [obj.metadata.name, obj.spec.agentRef.name]) if {
	obj.spec.agentRef
} else := sprintf("Job %q has no Budget: set spec.budgetRef.name (or spec.template.budgetRef.name)", [obj.metadata.name])

problems contains {"msg": msg} if {
	input.parameters.requireExisting == true
	name = referenced
	not budgets[name]
	msg := sprintf("%s %q references Budget %q, which does not exist in namespace %q; create it first or correct the reference", [obj.kind, obj.metadata.name, name, ns])
}

referenced := obj.spec.budgetRef.name if obj.kind == "Agent"

referenced := job_budget if obj.kind == "Job"

# Fast path: an Agent with a named Budget that need not exist yet, or exists.
fine if {
	input.review.object.kind == "Agent"
	name := input.review.object.spec.budgetRef.name
	is_string(name)
	name != ""
	not input.parameters.requireExisting == true
}

fine if {
	input.review.object.kind == "Agent"
	name := input.review.object.spec.budgetRef.name
	is_string(name)
	name != ""
	budgets[name]
}

# A Job charged to a named Budget (its own, its inline template's, or its Agent's, as
# `job_budget` finds it) that need not exist yet; or a DR drill, which needs none.
fine if {
	input.review.object.kind == "Job"
	not input.parameters.requireExisting == true
	name = input.review.object.spec.budgetRef.name
	is_string(name)
	name != ""
}

fine if {
	input.review.object.kind == "Job"
	not input.parameters.requireExisting == true
	name = input.review.object.spec.template.budgetRef.name
	is_string(name)
	name != ""
}

fine if {
	input.review.object.kind == "Job"
	not input.parameters.requireExisting == true
	ns := object.get(input.review.object, ["metadata", "namespace"], object.get(input.review, "namespace", ""))
	agent = object.get(data.inventory, ["namespace", ns, "soma.dev/v1alpha1", "Agent"], {})[input.review.object.spec.agentRef.name]
	name = agent.spec.budgetRef.name
	is_string(name)
	name != ""
}

fine if {
	input.review.object.kind == "Job"
	not input.parameters.requireExisting == true
	input.review.object.spec.drDrill
}

params_typed if is_object(input.parameters)

object_typed if {
	is_string(input.review.object.metadata.name)
	is_string(ns)
	is_object(object.get(obj, "spec", {}))
	is_string(object.get(obj, ["spec", "budgetRef", "name"], ""))
	agent_ref_typed
}

# `job_message` names the Agent when spec.agentRef is set: it needs its name.
agent_ref_typed if not "agentRef" in object.keys(object.get(obj, "spec", {}))

agent_ref_typed if is_string(obj.spec.agentRef.name)
