# Egress allow-list entries are well-formed and within the allowed domains and ranges.
#
# Applies to spec.sandbox.egress of an Agent and spec.template.sandbox.egress of a Job.
# Parameters:
#   allowedDomains: ["github.com", "*.example.com"]  # a host must be one of these or a
#                                                     # subdomain of a plain entry; "*.d" means
#                                                     # subdomains of d only (absent: any host)
#   allowedCidrs: ["10.0.0.0/8"]                     # a cidr must lie inside one (absent: any)
#   deniedCidrs: ["169.254.0.0/16"]                  # a cidr must not overlap any
#   minPrefixLength: 8                                # no range wider than /8 (IPv4)
#   allowWildcardHosts: false                         # allow "*.example.com" entries
package soma.egress

rules := object.get(input.review.object, ["spec", "sandbox", "egress"], []) if input.review.object.kind == "Agent"

rules := object.get(input.review.object, ["spec", "template", "sandbox", "egress"], []) if input.review.object.kind == "Job"

field := "spec.sandbox.egress" if input.review.object.kind == "Agent"

field := "spec.template.sandbox.egress" if input.review.object.kind == "Job"

has_cidr(rule) if object.get(rule, "cidr", "") != ""

has_host(rule) if object.get(rule, "host", "") != ""

violation contains {"msg": msg} if {
	some i, rule in rules
	has_cidr(rule)
	has_host(rule)
	msg := sprintf("%s[%d] sets both cidr and host; split it into two rules", [field, i])
}

violation contains {"msg": msg} if {
	some i, rule in rules
	not has_cidr(rule)
	not has_host(rule)
	msg := sprintf("%s[%d] needs a cidr (such as 10.20.0.0/16) or a host (such as api.github.com)", [field, i])
}

violation contains {"msg": msg} if {
	some i, rule in rules
	some port in object.get(rule, "ports", [])
	not valid_port(port)
	msg := sprintf("%s[%d] has port %v; ports are whole numbers from 1 to 65535", [field, i, port])
}

valid_port(p) if {
	is_number(p)
	p == floor(p)
	p >= 1
	p <= 65535
}

# Host names.

violation contains {"msg": msg} if {
	some i, rule in rules
	host := rule.host
	is_string(host)
	not well_formed_host(host)
	msg := sprintf("%s[%d].host %q is not a lower-case DNS name such as api.github.com (no scheme, port, path or IP address)", [field, i, host])
}

# `^(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]{2,}$`, spelled with string built-ins: a
# regex match costs more than the rest of this policy (see docs/policies.md, "Performance").
well_formed_host(host) if {
	count(host) <= 253
	name := trim_prefix(host, "*.")
	labels := split(name, ".")
	count(labels) >= 2
	every label in labels {
		well_formed_label(label)
	}
	tld := labels[count(labels) - 1]
	count(tld) >= 2
	trim(tld, "abcdefghijklmnopqrstuvwxyz") == ""
}

well_formed_label(label) if {
	count(label) > 0
	count(label) <= 63
	trim(label, "abcdefghijklmnopqrstuvwxyz0123456789-") == ""
	not startswith(label, "-")
	not endswith(label, "-")
}

violation contains {"msg": msg} if {
	not object.get(input.parameters, "allowWildcardHosts", false)
	some i, rule in rules
	startswith(rule.host, "*.")
	msg := sprintf("%s[%d].host %q is a wildcard; name each host the agent needs", [field, i, rule.host])
}

violation contains {"msg": msg} if {
	allowed := input.parameters.allowedDomains
	some i, rule in rules
	host := rule.host
	is_string(host)
	well_formed_host(host)
	not host_allowed(host, allowed)
	msg := sprintf("%s[%d].host %q is outside the allowed domains [%s]; ask your platform team to allow it", [field, i, host, concat(", ", allowed)])
}

host_allowed(host, allowed) if {
	some d in allowed
	not startswith(d, "*.")
	host == d
}

host_allowed(host, allowed) if {
	some d in allowed
	not startswith(d, "*.")
	endswith(host, concat("", [".", d]))
}

host_allowed(host, allowed) if {
	some d in allowed
	startswith(d, "*.")
	suffix := substring(d, 1, -1)
	endswith(host, suffix)
	host != substring(d, 2, -1)
}

# CIDR ranges.

violation contains {"msg": msg} if {
	some i, rule in rules
	cidr := rule.cidr
	is_string(cidr)
	not net.cidr_is_valid(cidr)
	msg := sprintf("%s[%d].cidr %q is not a valid CIDR such as 10.20.0.0/16", [field, i, cidr])
}

violation contains {"msg": msg} if {
	some i, rule in rules
	cidr := rule.cidr
	is_string(cidr)
	net.cidr_is_valid(cidr)
	not contains(cidr, ":")
	shortest := object.get(input.parameters, "minPrefixLength", 8)
	prefix := to_number(split(cidr, "/")[1])
	prefix < shortest
	msg := sprintf("%s[%d].cidr %q opens more than a /%d; narrow it to the addresses the agent needs", [field, i, cidr, shortest])
}

violation contains {"msg": msg} if {
	some i, rule in rules
	cidr := rule.cidr
	is_string(cidr)
	net.cidr_is_valid(cidr)
	some denied in object.get(input.parameters, "deniedCidrs", [])
	overlaps(cidr, denied)
	msg := sprintf("%s[%d].cidr %q overlaps the denied range %s", [field, i, cidr, denied])
}

overlaps(a, b) if net.cidr_contains(a, b)

overlaps(a, b) if net.cidr_contains(b, a)

violation contains {"msg": msg} if {
	allowed := input.parameters.allowedCidrs
	some i, rule in rules
	cidr := rule.cidr
	is_string(cidr)
	net.cidr_is_valid(cidr)
	not cidr_allowed(cidr, allowed)
	msg := sprintf("%s[%d].cidr %q is outside the allowed ranges [%s]", [field, i, cidr, concat(", ", allowed)])
}

cidr_allowed(cidr, allowed) if {
	some range in allowed
	net.cidr_contains(range, cidr)
}
