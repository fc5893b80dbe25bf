package soma.budgetref_test

import data.soma.budgetref

review(obj) := {"review": {"namespace": "research", "object": obj}, "parameters": {}}

meta(kind, name) := {"kind": kind, "metadata": {"name": name, "namespace": "research"}}

inventory := {"namespace": {"research": {"soma.dev/v1alpha1": {
	"Agent": {
		"with-budget": {"spec": {"budgetRef": {"name": "team"}}},
		"without-budget": {"spec": {}},
	},
	"Budget": {"team": {"spec": {}}},
}}}}

test_agent_with_budget if {
	count(budgetref.violation) == 0 with input as review(object.union(meta("Agent", "a"), {"spec": {"budgetRef": {"name": "team"}}}))
}

test_agent_without_budget if {
	some v in budgetref.violation with input as review(object.union(meta("Agent", "a"), {"spec": {}}))
	contains(v.msg, "no spec.budgetRef")
}

test_agent_with_empty_budget_name if {
	count(budgetref.violation) == 1 with input as review(object.union(meta("Agent", "a"), {"spec": {"budgetRef": {"name": ""}}}))
}

test_job_with_own_budget if {
	count(budgetref.violation) == 0 with input as review(object.union(meta("Job", "j"), {"spec": {"agentRef": {"name": "without-budget"}, "budgetRef": {"name": "team"}}}))
}

test_job_inherits_agent_budget if {
	inp := review(object.union(meta("Job", "j"), {"spec": {"agentRef": {"name": "with-budget"}}}))
	count(budgetref.violation) == 0 with input as inp with data.inventory as inventory
}

test_job_on_agent_without_budget if {
	inp := review(object.union(meta("Job", "j"), {"spec": {"agentRef": {"name": "without-budget"}}}))
	some v in budgetref.violation with input as inp with data.inventory as inventory
	contains(v.msg, `give Agent "without-budget" a spec.budgetRef`)
}

test_job_on_unknown_agent_fails_closed if {
	inp := review(object.union(meta("Job", "j"), {"spec": {"agentRef": {"name": "ghost"}}}))
	count(budgetref.violation) == 1 with input as inp with data.inventory as inventory
}

test_template_job_budget if {
	inp := review(object.union(meta("Job", "j"), {"spec": {"template": {"image": "x", "budgetRef": {"name": "team"}}}}))
	count(budgetref.violation) == 0 with input as inp
}

test_dr_drill_is_exempt if {
	inp := review(object.union(meta("Job", "d"), {"spec": {"drDrill": {"verify": true}}}))
	count(budgetref.violation) == 0 with input as inp
}

test_require_existing if {
	inp := {"review": {"namespace": "research", "object": object.union(meta("Agent", "a"), {"spec": {"budgetRef": {"name": "nope"}}})}, "parameters": {"requireExisting": true}}
	some v in budgetref.violation with input as inp with data.inventory as inventory
	contains(v.msg, `Budget "nope", which does not exist`)
	ok := object.union(inp, {"review": {"namespace": "research", "object": object.union(meta("Agent", "a"), {"spec": {"budgetRef": {"name": "team"}}})}})
	count(budgetref.violation) == 0 with input as ok with data.inventory as inventory
}
