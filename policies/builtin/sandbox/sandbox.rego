# An Agent's (or inline Job template's) sandbox is no weaker than its namespace's profile.
#
# The namespace picks a profile with the label `soma.dev/sandbox-profile`; namespaces without
# it get `defaultProfile`. The Namespace is read from the synced inventory
# (data.inventory.cluster.v1.Namespace), as Gatekeeper does.
# Parameters:
#   defaultProfile: baseline
#   profiles:
#     <name>:
#       runtimeClassNames: [gvisor, kata]   # one of these must be set (absent: any or none)
#       allowServiceAccountToken: false     # sandbox.automountServiceAccountToken must be false
#       allowCidrEgress: false              # egress only by host name
#       maxEgressRules: 8
#       maxRequestTimeoutSeconds: 600
#       requireResourceLimits: true         # sandbox.resources.limits.cpu and .memory
#
# Layout, shared by the built-ins (docs/policies.md, "Performance"): `problems` holds the
# checks, one rule each, as they read best; `fine` is a fast path that holds only when none of
# them can fire, so `violation` skips them in the common case. `vm_violation` is what Soma asks
# regorus' register VM for: the empty set when `fine` holds (as `violation` is then), else
# `violation` if every field the checks read has the type they expect (`object_typed`; the
# parameters are checked once per constraint by `params_typed`), else undefined, since the VM
# 0.14 silently skips a body where the interpreter reports an error. The spelling avoids `x := <possibly undefined>` where a later `else` or `not`
# depends on it failing (the VM does not stop there).
package soma.sandbox

profile_label := "soma.dev/sandbox-profile"

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

sandbox := object.get(input.review.object, ["spec", "sandbox"], {}) if input.review.object.kind == "Agent"

sandbox := object.get(input.review.object, ["spec", "template", "sandbox"], {}) if {
	input.review.object.kind == "Job"
	input.review.object.spec.template
}

namespace := input.review.namespace if {
	input.review.namespace != ""
} else := object.get(input.review.object, ["metadata", "namespace"], "")

# `=`: an absent label must fail this body (and take the `else`) in the VM too.
profile_name := name if {
	name = data.inventory.cluster.v1.Namespace[namespace].metadata.labels[profile_label]
} else := object.get(input.parameters, "defaultProfile", "baseline")

profile := input.parameters.profiles[profile_name]

problems contains {"msg": msg} if {
	sandbox
	not input.parameters.profiles[profile_name]
	msg := sprintf("namespace %q asks for sandbox profile %q, which is not defined; known profiles: [%s]. Fix the namespace label %s or the policy's parameters", [namespace, profile_name, concat(", ", object.keys(object.get(input.parameters, "profiles", {}))), profile_label])
}

problems contains {"msg": msg} if {
	allowed := profile.runtimeClassNames
	count(allowed) > 0
	rc := object.get(sandbox, "runtimeClassName", "")
	not rc in allowed
	msg := sprintf("namespace %q requires sandbox profile %q: set spec.sandbox.runtimeClassName to one of [%s] (got %q)", [namespace, profile_name, concat(", ", allowed), rc])
}

problems contains {"msg": msg} if {
	profile.allowServiceAccountToken == false
	sandbox.automountServiceAccountToken == true
	msg := sprintf("namespace %q requires sandbox profile %q, which forbids a ServiceAccount token in agent pods: remove spec.sandbox.automountServiceAccountToken", [namespace, profile_name])
}

problems contains {"msg": msg} if {
	profile.allowCidrEgress == false
	some i, rule in object.get(sandbox, "egress", [])
	rule.cidr
	msg := sprintf("namespace %q requires sandbox profile %q, which allows egress by host name only: replace spec.sandbox.egress[%d] (cidr %q) with a host rule", [namespace, profile_name, i, rule.cidr])
}

problems contains {"msg": msg} if {
	limit := profile.maxEgressRules
	n := count(object.get(sandbox, "egress", []))
	n > limit
	msg := sprintf("namespace %q requires sandbox profile %q, which allows at most %d egress rules; spec.sandbox.egress has %d", [namespace, profile_name, limit, n])
}

problems contains {"msg": msg} if {
	limit := profile.maxRequestTimeoutSeconds
	t := object.get(sandbox, "requestTimeoutSeconds", 0)
	t > limit
	msg := sprintf("namespace %q requires sandbox profile %q: spec.sandbox.requestTimeoutSeconds is %d, the most allowed is %d", [namespace, profile_name, t, limit])
}

problems contains {"msg": msg} if {
	profile.requireResourceLimits == true
	sandbox
	some res in ["cpu", "memory"]
	not sandbox.resources.limits[res]
	msg := sprintf("namespace %q requires sandbox profile %q: set spec.sandbox.resources.limits.%s", [namespace, profile_name, res])
}

# Fast path: every check in one body (rule and function calls are what cost in the VM), each
# line holding exactly when its problem cannot fire, or stricter; for an Agent and for a Job's
# inline template (where `sandbox` is that template's sandbox). The namespace and profile
# are looked up as `namespace` and `profile_name` do when the review names the namespace.
fine if {
	path = {"Agent": ["spec", "sandbox"], "Job": ["spec", "template", "sandbox"]}[input.review.object.kind]
	s := object.get(input.review.object, path, {})
	is_object(s)
	ns := input.review.namespace
	ns != ""
	labels := object.get(data.inventory, ["cluster", "v1", "Namespace", ns, "metadata", "labels"], {})
	is_object(labels)
	p := input.parameters.profiles[object.get(labels, profile_label, object.get(input.parameters, "defaultProfile", "baseline"))]
	is_object(p)
	rc := object.get(s, "runtimeClassName", "")
	rc in object.get(p, "runtimeClassNames", [rc])
	[object.get(p, "allowServiceAccountToken", null), object.get(s, "automountServiceAccountToken", null)] != [false, true]
	egress := object.get(s, "egress", [])
	is_array(egress)
	count(egress) <= object.get(p, "maxEgressRules", count(egress))
	t := object.get(s, "requestTimeoutSeconds", 0)
	is_number(t)
	t <= object.get(p, "maxRequestTimeoutSeconds", t)
	count([1 | object.get(p, "allowCidrEgress", null) == false; some rule in egress; rule.cidr]) == 0
	count([1 | object.get(p, "requireResourceLimits", null) == true; some res in ["cpu", "memory"]; not s.resources.limits[res]]) == 0
}

# A Job on an existing Agent (no inline template): no check applies (the Agent's sandbox was
# checked when it was admitted).
fine if {
	input.review.object.kind == "Job"
	not input.review.object.spec.template
}

# The parameters, checked once per constraint.
params_typed if {
	is_object(input.parameters)
	is_string(object.get(input.parameters, "defaultProfile", ""))
	is_object(object.get(input.parameters, "profiles", {}))
	every p in object.get(input.parameters, "profiles", {}) {
		profile_typed(p)
	}
}

# `object.get(x, key, <a value of the type>)`: absent, or of that type.
profile_typed(p) if {
	is_object(p)
	is_array(object.get(p, "runtimeClassNames", []))
	every c in object.get(p, "runtimeClassNames", []) {
		is_string(c)
	}
	integer(object.get(p, "maxEgressRules", 0))
	integer(object.get(p, "maxRequestTimeoutSeconds", 0))
}

object_typed if {
	is_string(namespace)
	is_string(profile_name)
	sandbox_typed
}

sandbox_typed if {
	input.review.object.kind == "Agent"
	fields_typed(object.get(input.review.object, ["spec", "sandbox"], {}))
}

sandbox_typed if {
	input.review.object.kind == "Job"
	fields_typed(object.get(input.review.object, ["spec", "template", "sandbox"], {}))
}

sandbox_typed if not input.review.object.kind in {"Agent", "Job"}

fields_typed(s) if {
	is_object(s)
	is_string(object.get(s, "runtimeClassName", ""))
	integer(object.get(s, "requestTimeoutSeconds", 0))
	is_array(object.get(s, "egress", []))
	every rule in object.get(s, "egress", []) {
		is_object(rule)
		is_string(object.get(rule, "cidr", ""))
	}
}

# What `%d` accepts.
integer(n) if {
	is_number(n)
	floor(n) == n
}
