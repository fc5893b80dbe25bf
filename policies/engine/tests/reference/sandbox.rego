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
package soma.sandbox

profile_label := "soma.dev/sandbox-profile"

sandbox := object.get(input.review.object, ["spec", "sandbox"], {}) if input.review.object.kind == "Agent"

sandbox := object.get(input.review.object, ["spec", "template", "sandbox"], {}) if {
	input.review.object.kind == "Job"
	input.review.object.spec.template
}

namespace := ns if {
	ns := input.review.namespace
	ns != ""
} else := object.get(input.review.object, ["metadata", "namespace"], "")

profile_name := name if {
	labels := data.inventory.cluster.v1.Namespace[namespace].metadata.labels
	name := labels[profile_label]
} else := object.get(input.parameters, "defaultProfile", "baseline")

profile := input.parameters.profiles[profile_name]

violation contains {"msg": msg} if {
	sandbox
	not input.parameters.profiles[profile_name]
	msg := sprintf("namespace %q asks for sandbox profile %q, which is not defined; known profiles: [%s]. Fix the namespace label %s or the policy's parameters", [namespace, profile_name, concat(", ", object.keys(object.get(input.parameters, "profiles", {}))), profile_label])
}

violation contains {"msg": msg} if {
	allowed := profile.runtimeClassNames
	count(allowed) > 0
	rc := object.get(sandbox, "runtimeClassName", "")
	not rc in allowed
	msg := sprintf("namespace %q requires sandbox profile %q: set spec.sandbox.runtimeClassName to one of [%s] (got %q)", [namespace, profile_name, concat(", ", allowed), rc])
}

violation contains {"msg": msg} if {
	profile.allowServiceAccountToken == false
	sandbox.automountServiceAccountToken == true
	msg := sprintf("namespace %q requires sandbox profile %q, which forbids a ServiceAccount token in agent pods: remove spec.sandbox.automountServiceAccountToken", [namespace, profile_name])
}

violation contains {"msg": msg} if {
	profile.allowCidrEgress == false
	some i, rule in object.get(sandbox, "egress", [])
	rule.cidr
	msg := sprintf("namespace %q requires sandbox profile %q, which allows egress by host name only: replace spec.sandbox.egress[%d] (cidr %q) with a host rule", [namespace, profile_name, i, rule.cidr])
}

violation contains {"msg": msg} if {
	limit := profile.maxEgressRules
	n := count(object.get(sandbox, "egress", []))
	n > limit
	msg := sprintf("namespace %q requires sandbox profile %q, which allows at most %d egress rules; spec.sandbox.egress has %d", [namespace, profile_name, limit, n])
}

violation contains {"msg": msg} if {
	limit := profile.maxRequestTimeoutSeconds
	t := object.get(sandbox, "requestTimeoutSeconds", 0)
	t > limit
	msg := sprintf("namespace %q requires sandbox profile %q: spec.sandbox.requestTimeoutSeconds is %d, the most allowed is %d", [namespace, profile_name, t, limit])
}

violation contains {"msg": msg} if {
	profile.requireResourceLimits == true
	sandbox
	some res in ["cpu", "memory"]
	not sandbox.resources.limits[res]
	msg := sprintf("namespace %q requires sandbox profile %q: set spec.sandbox.resources.limits.%s", [namespace, profile_name, res])
}
