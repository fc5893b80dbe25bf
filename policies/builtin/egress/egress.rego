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
#
# Layout: see sandbox.rego (`problems`, `fine`, `vm_violation`, `params_typed`, `object_typed`).
# `allowed = …` rather than `:=`: an absent parameter must stop the body in the VM too.
package soma.egress

violation contains v if {
	not fine
	some v in problems
}

vm_violation := set() if fine
else := violation if object_typed

rules := object.get(input.review.object, ["spec", "sandbox", "egress"], []) if input.review.object.kind == "Agent"

rules := object.get(input.review.object, ["spec", "template", "sandbox", "egress"], []) if input.review.object.kind == "Job"

field := "spec.sandbox.egress" if input.review.object.kind == "Agent"

field := "spec.template.sandbox.egress" if input.review.object.kind == "Job"

has_cidr(rule) if object.get(rule, "cidr", "") != ""

has_host(rule) if object.get(rule, "host", "") != ""

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
	has_cidr(rule)
	has_host(rule)
	msg := sprintf("%s[%d] sets both cidr and host; split it into two rules", [field, i])
}

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
	not has_cidr(rule)
	not has_host(rule)
	msg := sprintf("%s[%d] needs a cidr (such as 10.20.0.0/16) or a host (such as api.github.com)", [field, i])
}

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
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

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
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

problems contains {"msg": msg} if {
	not object.get(input.parameters, "allowWildcardHosts", false)
	some i in unclear
	rule := rules[i]
	startswith(rule.host, "*.")
	msg := sprintf("%s[%d].host %q is a wildcard; name each host the agent needs", [field, i, rule.host])
}

problems contains {"msg": msg} if {
	allowed = input.parameters.allowedDomains
	some i in unclear
	rule := rules[i]
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

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
	cidr := rule.cidr
	is_string(cidr)
	not net.cidr_is_valid(cidr)
	msg := sprintf("%s[%d].cidr %q is not a valid CIDR such as 10.20.0.0/16", [field, i, cidr])
}

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
	cidr := rule.cidr
	is_string(cidr)
	net.cidr_is_valid(cidr)
	not contains(cidr, ":")
	shortest := object.get(input.parameters, "minPrefixLength", 8)
	prefix := to_number(split(cidr, "/")[1])
	prefix < shortest
	msg := sprintf("%s[%d].cidr %q opens more than a /%d; narrow it to the addresses the agent needs", [field, i, cidr, shortest])
}

problems contains {"msg": msg} if {
	some i in unclear
	rule := rules[i]
	cidr := rule.cidr
	is_string(cidr)
	net.cidr_is_valid(cidr)
	some denied in object.get(input.parameters, "deniedCidrs", [])
	overlaps(cidr, denied)
	msg := sprintf("%s[%d].cidr %q overlaps the denied range %s", [field, i, cidr, denied])
}

overlaps(a, b) if net.cidr_contains(a, b)

overlaps(a, b) if net.cidr_contains(b, a)

problems contains {"msg": msg} if {
	allowed = input.parameters.allowedCidrs
	some i in unclear
	rule := rules[i]
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

# Fast path, rule by rule: a well-formed host inside the allowed domains, or an IPv4 range
# inside the allowed ranges, clear of the denied ones and no wider than allowed; valid ports.
# Each line holds only when the corresponding problem cannot fire for that rule, so the
# checks above look at the other rules (`unclear`) only. A host rule's checks are one body
# each (with and without `allowedDomains`), with the domain and port checks inline:
# every rule or function call costs in the VM.
fine if {
	is_array(rules)
	count(unclear) == 0
}

fine if not input.review.object.kind in {"Agent", "Job"}

unclear contains i if {
	some i, rule in rules
	not rule_fine(rule)
}

rule_fine(rule) if {
	host := rule.host
	is_string(host)
	not "cidr" in object.keys(rule)
	# well_formed_host, for names of at most 63 characters and no wildcard: lower-case
	# letters, digits, dots and dashes; no empty label; no label that starts or ends with a
	# dash; a top-level domain of two or more letters. (String built-ins: a regex match
	# costs more than all of them, see docs/policies.md, "Performance".)
	count(host) <= 63
	trim(host, "abcdefghijklmnopqrstuvwxyz0123456789-.") == ""
	not strings.any_prefix_match(host, [".", "-"])
	not endswith(host, "-")
	strings.replace_n({"..": "", ".-": "", "-.": ""}, host) == host
	labels := split(host, ".")
	count(labels) >= 2
	tld := labels[count(labels) - 1]
	count(tld) >= 2
	trim(tld, "abcdefghijklmnopqrstuvwxyz") == ""
	# domain_fine: "." + host ends with "." + d for "github.com" (it and its subdomains)
	# and for "*.example.com" (the subdomains only, so not the host "example.com").
	some d in input.parameters.allowedDomains
	endswith(concat("", [".", host]), concat("", [".", trim_prefix(d, "*.")]))
	[startswith(d, "*."), host] != [true, trim_prefix(d, "*.")]
	# ports_fine
	ports := object.get(rule, "ports", [])
	is_array(ports)
	every p in ports {
		is_number(p)
		p == floor(p)
		p >= 1
		p <= 65535
	}
}

rule_fine(rule) if {
	host := rule.host
	is_string(host)
	not "cidr" in object.keys(rule)
	# as above
	count(host) <= 63
	trim(host, "abcdefghijklmnopqrstuvwxyz0123456789-.") == ""
	not strings.any_prefix_match(host, [".", "-"])
	not endswith(host, "-")
	strings.replace_n({"..": "", ".-": "", "-.": ""}, host) == host
	labels := split(host, ".")
	count(labels) >= 2
	tld := labels[count(labels) - 1]
	count(tld) >= 2
	trim(tld, "abcdefghijklmnopqrstuvwxyz") == ""
	domains_unrestricted
	ports_fine(rule)
}

rule_fine(rule) if {
	cidr := rule.cidr
	is_string(cidr)
	not "host" in object.keys(rule)
	net.cidr_is_valid(cidr)
	not contains(cidr, ":")
	to_number(split(cidr, "/")[1]) >= object.get(input.parameters, "minPrefixLength", 8)
	denied := object.get(input.parameters, "deniedCidrs", [])
	count([d | some d in denied; net.cidr_contains(cidr, d)]) == 0
	count([d | some d in denied; net.cidr_contains(d, cidr)]) == 0
	cidr_fine(cidr)
	ports_fine(rule)
}

domains_unrestricted if not "allowedDomains" in object.keys(input.parameters)

cidr_fine(_) if not "allowedCidrs" in object.keys(input.parameters)

cidr_fine(cidr) if cidr_allowed(cidr, input.parameters.allowedCidrs)

ports_fine(rule) if {
	ports := object.get(rule, "ports", [])
	is_array(ports)
	count([p | some p in ports; valid_port(p)]) == count(ports)
}

params_typed if {
	is_object(input.parameters)
	strings(object.get(input.parameters, "allowedDomains", []))
	ranges(object.get(input.parameters, "allowedCidrs", []))
	ranges(object.get(input.parameters, "deniedCidrs", []))
	n := object.get(input.parameters, "minPrefixLength", 8)
	is_number(n)
	floor(n) == n
}

strings(a) if {
	is_array(a)
	every s in a {
		is_string(s)
	}
}

ranges(a) if {
	strings(a)
	every s in a {
		net.cidr_is_valid(s)
	}
}

object_typed if {
	is_array(rules)
	every rule in rules {
		is_object(rule)
		is_string(object.get(rule, "host", ""))
		is_array(object.get(rule, "ports", []))
	}
}

object_typed if not input.review.object.kind in {"Agent", "Job"}
