package soma.sandbox_test

import data.soma.sandbox

params := {
	"defaultProfile": "baseline",
	"profiles": {
		"baseline": {"maxRequestTimeoutSeconds": 3600},
		"restricted": {
			"runtimeClassNames": ["gvisor", "kata"],
			"allowServiceAccountToken": false,
			"allowCidrEgress": false,
			"maxEgressRules": 2,
			"maxRequestTimeoutSeconds": 600,
			"requireResourceLimits": true,
		},
	},
}

inventory := {"cluster": {"v1": {"Namespace": {
	"secure": {"metadata": {"name": "secure", "labels": {"soma.dev/sandbox-profile": "restricted"}}},
	"odd": {"metadata": {"name": "odd", "labels": {"soma.dev/sandbox-profile": "nonexistent"}}},
}}}}

agent(ns, sb) := {"review": {"namespace": ns, "object": {"kind": "Agent", "metadata": {"namespace": ns}, "spec": {"sandbox": sb}}}, "parameters": params}

strong := {
	"runtimeClassName": "gvisor",
	"egress": [{"host": "api.github.com"}],
	"resources": {"limits": {"cpu": "1", "memory": "512Mi"}},
	"requestTimeoutSeconds": 300,
}

test_strong_sandbox_in_restricted_namespace_passes if {
	count(sandbox.violation) == 0 with input as agent("secure", strong) with data.inventory as inventory
}

test_missing_runtime_class_is_denied if {
	sb := object.remove(strong, ["runtimeClassName"])
	some v in sandbox.violation with input as agent("secure", sb) with data.inventory as inventory
	contains(v.msg, "runtimeClassName to one of [gvisor, kata]")
}

test_service_account_token_is_denied if {
	sb := object.union(strong, {"automountServiceAccountToken": true})
	some v in sandbox.violation with input as agent("secure", sb) with data.inventory as inventory
	contains(v.msg, "automountServiceAccountToken")
}

test_cidr_egress_is_denied if {
	sb := object.union(strong, {"egress": [{"cidr": "10.0.0.0/8"}]})
	some v in sandbox.violation with input as agent("secure", sb) with data.inventory as inventory
	contains(v.msg, "egress[0]")
}

test_too_many_egress_rules if {
	sb := object.union(strong, {"egress": [{"host": "a.example.com"}, {"host": "b.example.com"}, {"host": "c.example.com"}]})
	some v in sandbox.violation with input as agent("secure", sb) with data.inventory as inventory
	contains(v.msg, "at most 2 egress rules")
}

test_missing_limits if {
	sb := object.remove(strong, ["resources"])
	count(sandbox.violation) == 2 with input as agent("secure", sb) with data.inventory as inventory
}

test_unlabelled_namespace_gets_default_profile if {
	count(sandbox.violation) == 0 with input as agent("plain", {}) with data.inventory as inventory
	some v in sandbox.violation with input as agent("plain", {"requestTimeoutSeconds": 7200}) with data.inventory as inventory
	contains(v.msg, `profile "baseline"`)
}

test_unknown_profile_is_denied if {
	some v in sandbox.violation with input as agent("odd", strong) with data.inventory as inventory
	contains(v.msg, "not defined")
}

test_job_template_sandbox_is_checked if {
	inp := {"review": {"namespace": "secure", "object": {"kind": "Job", "spec": {"template": {"image": "x", "sandbox": {}}}}}, "parameters": params}
	count(sandbox.violation) > 0 with input as inp with data.inventory as inventory
}

test_agent_ref_job_has_no_sandbox_to_check if {
	inp := {"review": {"namespace": "secure", "object": {"kind": "Job", "spec": {"agentRef": {"name": "a"}}}}, "parameters": params}
	count(sandbox.violation) == 0 with input as inp with data.inventory as inventory
}
