package main

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const (
	spiffeCSIDriver  = "csi.spiffe.io"
	spiffeSocketEnv  = "SPIFFE_ENDPOINT_SOCKET"
	livenessPath     = "/healthz"
	readinessPath    = "/readyz"
	minReplicas      = 2
	namespaceNameKey = "kubernetes.io/metadata.name"
	podSecurityKey   = "pod-security.kubernetes.io/enforce"
)

var (
	// Environment variables whose literal value would be a secret baked into a manifest.
	secretEnvName = regexp.MustCompile(`(?i)(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_?KEY|API_?KEY|CREDENTIAL)`)
	// user:password@ in a URL, and PEM private keys: never in a manifest.
	passwordInURL = regexp.MustCompile(`://[^/@\s"']*:[^/@\s"']+@`)
	pemPrivateKey = regexp.MustCompile(`-----BEGIN [A-Z ]*PRIVATE KEY-----`)
)

// workload is anything with a pod template (or a bare Pod).
type workload struct {
	obj       Object
	replicas  *int32 // nil: not a replicated kind
	podLabels map[string]string
	spec      *corev1.PodSpec
}

type checker struct {
	problems        []string
	objects         []Object
	namespaces      map[string]*corev1.Namespace
	configMaps      map[string]*corev1.ConfigMap
	serviceAccounts map[string]*corev1.ServiceAccount
	workloads       []workload
	// Workloads (namespace/name) some NetworkPolicy selects.
	isolated map[string]bool
}

func (c *checker) add(o Object, format string, args ...any) {
	c.problems = append(c.problems, o.Where()+": "+fmt.Sprintf(format, args...))
}

// check applies every rule to the decoded objects and returns the problems found.
func check(k *Kustomization, objects []Object) []string {
	c := &checker{
		objects:         objects,
		namespaces:      map[string]*corev1.Namespace{},
		configMaps:      map[string]*corev1.ConfigMap{},
		serviceAccounts: map[string]*corev1.ServiceAccount{},
		isolated:        map[string]bool{},
	}
	for _, image := range k.Images {
		if image.NewTag == "latest" || (image.NewTag == "" && image.Digest == "") {
			c.problems = append(c.problems, fmt.Sprintf(
				"kustomization.yaml: images %s: set newTag (not latest) or digest", image.Name))
		}
	}
	c.index()
	c.checkMetadata()
	for _, o := range c.objects {
		switch v := o.Value.(type) {
		case *corev1.Namespace:
			if v.Labels[podSecurityKey] != "restricted" {
				c.add(o, "label %s must be \"restricted\" (Pod Security Admission)", podSecurityKey)
			}
		case *corev1.Secret:
			if len(v.Data) > 0 || len(v.StringData) > 0 {
				c.add(o, "a Secret with data: secrets are created out of band, never kept in manifests")
			}
		case *corev1.ServiceAccount:
			if v.AutomountServiceAccountToken == nil || *v.AutomountServiceAccountToken {
				c.add(o, "automountServiceAccountToken must be false (the broker never calls the Kubernetes API)")
			}
		case *corev1.ConfigMap:
			c.checkConfigMap(o, v)
		case *corev1.Service:
			c.checkService(o, v)
		case *policyv1.PodDisruptionBudget:
			c.checkPDB(o, v)
		case *networkingv1.NetworkPolicy:
			c.checkNetworkPolicy(o, v)
		case *ClusterSPIFFEID:
			c.checkClusterSPIFFEID(o, v)
		}
	}
	if len(c.workloads) == 0 {
		c.problems = append(c.problems, "no Deployment: nothing runs the broker")
	}
	for _, w := range c.workloads {
		c.checkWorkload(w)
	}
	return c.problems
}

func (c *checker) index() {
	for _, o := range c.objects {
		key := o.Meta.Namespace + "/" + o.Meta.Name
		switch v := o.Value.(type) {
		case *corev1.Namespace:
			c.namespaces[o.Meta.Name] = v
		case *corev1.ConfigMap:
			c.configMaps[key] = v
		case *corev1.ServiceAccount:
			c.serviceAccounts[key] = v
		case *appsv1.Deployment:
			c.workloads = append(c.workloads, workload{o, v.Spec.Replicas, v.Spec.Template.Labels, &v.Spec.Template.Spec})
		case *appsv1.StatefulSet:
			c.workloads = append(c.workloads, workload{o, v.Spec.Replicas, v.Spec.Template.Labels, &v.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			c.workloads = append(c.workloads, workload{o, nil, v.Spec.Template.Labels, &v.Spec.Template.Spec})
		case *corev1.Pod:
			c.workloads = append(c.workloads, workload{o, nil, v.Labels, &v.Spec})
		}
	}
}

func clusterScoped(o Object) bool {
	return o.GVK.Kind == "Namespace" || o.GVK == ClusterSPIFFEIDKind
}

func (c *checker) checkMetadata() {
	if len(c.namespaces) != 1 {
		c.problems = append(c.problems, fmt.Sprintf("expected exactly one Namespace, found %d", len(c.namespaces)))
	}
	seen := map[string]bool{}
	for _, o := range c.objects {
		if o.Meta.Name == "" {
			c.add(o, "metadata.name is empty")
		}
		key := o.GVK.String() + " " + o.Meta.Namespace + "/" + o.Meta.Name
		if seen[key] {
			c.add(o, "defined twice")
		}
		seen[key] = true
		if clusterScoped(o) {
			if o.Meta.Namespace != "" {
				c.add(o, "cluster-scoped, must not set metadata.namespace")
			}
			continue
		}
		if _, ok := c.namespaces[o.Meta.Namespace]; !ok {
			c.add(o, "metadata.namespace %q is not the Namespace of these manifests", o.Meta.Namespace)
		}
	}
}

func (c *checker) checkConfigMap(o Object, cm *corev1.ConfigMap) {
	for key, value := range cm.Data {
		if passwordInURL.MatchString(value) {
			c.add(o, "data[%s] has a password in a URL: secrets come from a Secret, at run time", key)
		}
		if pemPrivateKey.MatchString(value) {
			c.add(o, "data[%s] holds a private key", key)
		}
	}
	if len(cm.BinaryData) > 0 {
		c.add(o, "binaryData cannot be reviewed: use data")
	}
}

// selecting returns the workloads of namespace ns whose pod labels the selector matches.
func (c *checker) selecting(ns string, selector labels.Selector) []workload {
	var found []workload
	for _, w := range c.workloads {
		if w.obj.Meta.Namespace == ns && selector.Matches(labels.Set(w.podLabels)) {
			found = append(found, w)
		}
	}
	return found
}

func (c *checker) labelSelector(o Object, field string, sel *metav1.LabelSelector) labels.Selector {
	if sel == nil || (len(sel.MatchLabels) == 0 && len(sel.MatchExpressions) == 0) {
		c.add(o, "%s is empty: it would select every pod", field)
		return nil
	}
	selector, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		c.add(o, "%s: %v", field, err)
		return nil
	}
	return selector
}

// containerPort finds the port of one of the containers that a Service or probe port names.
func containerPort(containers []corev1.Container, port intstr.IntOrString) (corev1.ContainerPort, bool) {
	for _, container := range containers {
		for _, p := range container.Ports {
			if (port.Type == intstr.String && p.Name == port.StrVal) ||
				(port.Type == intstr.Int && p.ContainerPort == port.IntVal) {
				return p, true
			}
		}
	}
	return corev1.ContainerPort{}, false
}

func (c *checker) checkService(o Object, svc *corev1.Service) {
	if svc.Spec.Type != "" && svc.Spec.Type != corev1.ServiceTypeClusterIP {
		c.add(o, "type %s exposes the broker outside the cluster; use ClusterIP", svc.Spec.Type)
	}
	if len(svc.Spec.Selector) == 0 {
		c.add(o, "selector is empty")
		return
	}
	selected := c.selecting(o.Meta.Namespace, labels.SelectorFromSet(svc.Spec.Selector))
	if len(selected) == 0 {
		c.add(o, "selector %v matches no workload's pods", svc.Spec.Selector)
		return
	}
	for _, port := range svc.Spec.Ports {
		target := port.TargetPort
		if target.Type == intstr.Int && target.IntVal == 0 {
			target = intstr.FromInt32(port.Port)
		}
		for _, w := range selected {
			if _, ok := containerPort(w.spec.Containers, target); !ok {
				c.add(o, "port %s: targetPort %s is no container port of %s", port.Name, target.String(), w.obj.Meta.Name)
			}
		}
	}
}

func (c *checker) checkPDB(o Object, pdb *policyv1.PodDisruptionBudget) {
	selector := c.labelSelector(o, "spec.selector", pdb.Spec.Selector)
	if selector == nil {
		return
	}
	selected := c.selecting(o.Meta.Namespace, selector)
	if len(selected) == 0 {
		c.add(o, "spec.selector matches no workload's pods")
	}
	if (pdb.Spec.MinAvailable == nil) == (pdb.Spec.MaxUnavailable == nil) {
		c.add(o, "set exactly one of minAvailable and maxUnavailable")
		return
	}
	if m := pdb.Spec.MaxUnavailable; m != nil && ((m.Type == intstr.Int && m.IntVal < 1) || m.String() == "0%") {
		c.add(o, "maxUnavailable %s blocks every voluntary eviction (node drains hang)", m.String())
	}
	if m := pdb.Spec.MinAvailable; m != nil {
		for _, w := range selected {
			if m.Type == intstr.String || w.replicas == nil || m.IntVal >= *w.replicas {
				c.add(o, "minAvailable %s must be a number below the %s replicas", m.String(), w.obj.Meta.Name)
			}
		}
	}
}

func (c *checker) checkNetworkPolicy(o Object, np *networkingv1.NetworkPolicy) {
	selector := c.labelSelector(o, "spec.podSelector", &np.Spec.PodSelector)
	if selector == nil {
		return
	}
	selected := c.selecting(o.Meta.Namespace, selector)
	if len(selected) == 0 {
		c.add(o, "spec.podSelector matches no workload's pods")
	}
	types := np.Spec.PolicyTypes
	if !slices.Contains(types, networkingv1.PolicyTypeIngress) || !slices.Contains(types, networkingv1.PolicyTypeEgress) {
		c.add(o, "policyTypes must list Ingress and Egress (default deny both ways)")
	}
	for i, rule := range np.Spec.Ingress {
		if len(rule.Ports) == 0 {
			c.add(o, "ingress[%d] allows every port", i)
		}
		for _, port := range rule.Ports {
			if port.Port == nil {
				c.add(o, "ingress[%d] allows every port", i)
				continue
			}
			for _, w := range selected {
				if _, ok := containerPort(w.spec.Containers, *port.Port); !ok {
					c.add(o, "ingress[%d] port %s is no container port of %s", i, port.Port.String(), w.obj.Meta.Name)
				}
			}
		}
	}
	for i, rule := range np.Spec.Egress {
		if len(rule.To) == 0 {
			c.add(o, "egress[%d] allows every destination", i)
		}
		if len(rule.Ports) == 0 {
			c.add(o, "egress[%d] allows every port", i)
		}
		for _, port := range rule.Ports {
			if port.Port == nil {
				c.add(o, "egress[%d] allows every port", i)
			}
		}
	}
	for _, w := range selected {
		c.isolated[w.obj.Meta.Namespace+"/"+w.obj.Meta.Name] = true
	}
}

func (c *checker) checkClusterSPIFFEID(o Object, id *ClusterSPIFFEID) {
	spec := id.Spec
	if !strings.HasPrefix(spec.SPIFFEIDTemplate, "spiffe://") {
		c.add(o, "spiffeIDTemplate %q is not a spiffe:// ID", spec.SPIFFEIDTemplate)
	}
	if spec.Admin || spec.Downstream {
		c.add(o, "admin and downstream must be false: the broker needs no SPIRE administration")
	}
	podSelector := c.labelSelector(o, "spec.podSelector", spec.PodSelector)
	nsSelector := c.labelSelector(o, "spec.namespaceSelector", spec.NamespaceSelector)
	if podSelector == nil || nsSelector == nil {
		return
	}
	var selected []workload
	for name, ns := range c.namespaces {
		nsLabels := labels.Set{namespaceNameKey: name}
		for k, v := range ns.Labels {
			nsLabels[k] = v
		}
		if nsSelector.Matches(nsLabels) {
			selected = append(selected, c.selecting(name, podSelector)...)
		}
	}
	if len(selected) == 0 {
		c.add(o, "its selectors match no workload's pods: the broker would get no SPIFFE ID")
	}
	for _, template := range spec.WorkloadSelectorTemplates {
		kind, value, _ := strings.Cut(strings.TrimPrefix(template, "k8s:"), ":")
		for _, w := range selected {
			var want []string
			switch kind {
			case "ns":
				want = []string{w.obj.Meta.Namespace}
			case "sa":
				want = []string{w.spec.ServiceAccountName}
			case "container-name":
				for _, container := range w.spec.Containers {
					want = append(want, container.Name)
				}
			default:
				continue
			}
			if !slices.Contains(want, value) {
				c.add(o, "workloadSelectorTemplates %q does not match %s (%v)", template, w.obj.Meta.Name, want)
			}
		}
	}
}

func (c *checker) checkWorkload(w workload) {
	o, spec := w.obj, w.spec
	if w.replicas != nil && *w.replicas < minReplicas {
		c.add(o, "replicas %d: at least %d (one replica down must not stop issuance and revocation)", *w.replicas, minReplicas)
	}
	if o.GVK.Kind == "Deployment" {
		if v := o.Value.(*appsv1.Deployment); v.Spec.Replicas == nil {
			c.add(o, "replicas is not set (defaults to 1): at least %d", minReplicas)
		}
	}
	if w.replicas != nil {
		spread := false
		for _, t := range spec.TopologySpreadConstraints {
			if s, err := metav1.LabelSelectorAsSelector(t.LabelSelector); err == nil && t.LabelSelector != nil && s.Matches(labels.Set(w.podLabels)) {
				spread = true
			}
		}
		if spec.Affinity != nil && spec.Affinity.PodAntiAffinity != nil {
			spread = true
		}
		if !spread {
			c.add(o, "no topologySpreadConstraints (selecting its pods) or podAntiAffinity: replicas may share a node")
		}
		if !c.isolated[o.Meta.Namespace+"/"+o.Meta.Name] {
			c.add(o, "no NetworkPolicy selects its pods")
		}
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds < 1 {
		c.add(o, "terminationGracePeriodSeconds must be set (the broker shuts down cleanly on SIGTERM)")
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		c.add(o, "hostNetwork, hostPID and hostIPC must be false")
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		c.add(o, "automountServiceAccountToken must be false")
	}
	if spec.ServiceAccountName == "" || spec.ServiceAccountName == "default" {
		c.add(o, "serviceAccountName must name its own ServiceAccount (not default)")
	} else if _, ok := c.serviceAccounts[o.Meta.Namespace+"/"+spec.ServiceAccountName]; !ok {
		c.add(o, "serviceAccountName %q is not among these manifests", spec.ServiceAccountName)
	}
	pod := spec.SecurityContext
	if pod == nil {
		pod = &corev1.PodSecurityContext{}
		c.add(o, "no pod securityContext")
	}
	// As Pod Security Admission's restricted profile: an explicit root setting at pod level is
	// refused even when every container overrides it.
	if pod.RunAsNonRoot != nil && !*pod.RunAsNonRoot {
		c.add(o, "pod securityContext.runAsNonRoot must not be false")
	}
	if pod.RunAsUser != nil && *pod.RunAsUser == 0 {
		c.add(o, "pod securityContext.runAsUser must not be 0 (root)")
	}
	volumes := map[string]corev1.Volume{}
	spiffeVolumes := map[string]bool{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
		switch {
		case v.HostPath != nil:
			c.add(o, "volume %s is a hostPath", v.Name)
		case v.CSI != nil && v.CSI.Driver == spiffeCSIDriver:
			spiffeVolumes[v.Name] = true
			if v.CSI.ReadOnly == nil || !*v.CSI.ReadOnly {
				c.add(o, "volume %s (%s) must be readOnly", v.Name, spiffeCSIDriver)
			}
		case v.ConfigMap != nil:
			cm, ok := c.configMaps[o.Meta.Namespace+"/"+v.ConfigMap.Name]
			if !ok && (v.ConfigMap.Optional == nil || !*v.ConfigMap.Optional) {
				c.add(o, "volume %s: ConfigMap %s is not among these manifests", v.Name, v.ConfigMap.Name)
			}
			for _, item := range v.ConfigMap.Items {
				if !ok {
					break
				}
				if _, has := cm.Data[item.Key]; !has {
					c.add(o, "volume %s: ConfigMap %s has no key %s", v.Name, v.ConfigMap.Name, item.Key)
				}
			}
		}
	}
	if len(spiffeVolumes) == 0 {
		c.add(o, "no %s volume: the broker gets its SVIDs from the SPIRE agent's Workload API", spiffeCSIDriver)
	}
	for _, container := range spec.InitContainers {
		c.checkContainer(o, pod, container, volumes, spiffeVolumes, false)
	}
	for _, container := range spec.Containers {
		c.checkContainer(o, pod, container, volumes, spiffeVolumes, true)
	}
}

func (c *checker) checkContainer(o Object, pod *corev1.PodSecurityContext, ctr corev1.Container,
	volumes map[string]corev1.Volume, spiffeVolumes map[string]bool, serving bool) {
	where := "container " + ctr.Name + ": "
	fail := func(format string, args ...any) { c.add(o, where+format, args...) }

	if problem := imageProblem(ctr.Image); problem != "" {
		fail("%s", problem)
	}
	sc := ctr.SecurityContext
	if sc == nil {
		sc = &corev1.SecurityContext{}
		fail("no securityContext")
	}
	runAsNonRoot := sc.RunAsNonRoot
	if runAsNonRoot == nil {
		runAsNonRoot = pod.RunAsNonRoot
	}
	if runAsNonRoot == nil || !*runAsNonRoot {
		fail("runAsNonRoot must be true")
	}
	runAsUser := sc.RunAsUser
	if runAsUser == nil {
		runAsUser = pod.RunAsUser
	}
	if runAsUser == nil || *runAsUser == 0 {
		fail("runAsUser must be a non-zero numeric uid")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		fail("allowPrivilegeEscalation must be false")
	}
	if sc.Privileged != nil && *sc.Privileged {
		fail("privileged must be false")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		fail("readOnlyRootFilesystem must be true")
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		fail("capabilities.drop must contain ALL")
	} else if len(sc.Capabilities.Add) > 0 {
		fail("capabilities.add must be empty, found %v", sc.Capabilities.Add)
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = pod.SeccompProfile
	}
	if seccomp == nil || (seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault && seccomp.Type != corev1.SeccompProfileTypeLocalhost) {
		fail("seccompProfile must be RuntimeDefault (or Localhost)")
	}
	c.checkResources(fail, ctr.Resources)
	for _, env := range ctr.Env {
		if env.ValueFrom == nil && env.Value != "" {
			if secretEnvName.MatchString(env.Name) {
				fail("env %s has a literal value: take secrets from a Secret (valueFrom.secretKeyRef)", env.Name)
			}
			if passwordInURL.MatchString(env.Value) || pemPrivateKey.MatchString(env.Value) {
				fail("env %s holds a secret in its literal value", env.Name)
			}
		}
	}
	socket := ""
	for _, env := range ctr.Env {
		if env.Name == spiffeSocketEnv {
			socket = env.Value
		}
	}
	for _, mount := range ctr.VolumeMounts {
		if _, ok := volumes[mount.Name]; !ok {
			fail("volumeMount %s names no volume", mount.Name)
		}
		if spiffeVolumes[mount.Name] {
			if !mount.ReadOnly {
				fail("volumeMount %s (the Workload API) must be readOnly", mount.Name)
			}
			dir := strings.TrimSuffix(mount.MountPath, "/") + "/"
			if !strings.HasPrefix(socket, "unix://"+dir) {
				fail("env %s = %q is not a unix:// socket under %s (the %s mount)", spiffeSocketEnv, socket, dir, mount.Name)
			}
		}
	}
	if !serving {
		return
	}
	c.checkProbe(fail, ctr, "livenessProbe", ctr.LivenessProbe, livenessPath, true)
	c.checkProbe(fail, ctr, "readinessProbe", ctr.ReadinessProbe, readinessPath, true)
	c.checkProbe(fail, ctr, "startupProbe", ctr.StartupProbe, livenessPath, false)
}

func (c *checker) checkResources(fail func(string, ...any), r corev1.ResourceRequirements) {
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		request, hasRequest := r.Requests[name]
		limit, hasLimit := r.Limits[name]
		if !hasRequest || request.IsZero() {
			fail("resources.requests.%s is not set", name)
		}
		if !hasLimit || limit.IsZero() {
			fail("resources.limits.%s is not set", name)
		}
		if hasRequest && hasLimit && limit.Cmp(request) < 0 {
			fail("resources.limits.%s %s is below its request %s", name, limit.String(), request.String())
		}
	}
}

func (c *checker) checkProbe(fail func(string, ...any), ctr corev1.Container, field string,
	probe *corev1.Probe, path string, required bool) {
	if probe == nil {
		if required {
			fail("no %s", field)
		}
		return
	}
	get := probe.HTTPGet
	if get == nil {
		fail("%s must be an httpGet of %s", field, path)
		return
	}
	if get.Scheme != corev1.URISchemeHTTPS {
		fail("%s scheme must be HTTPS (the broker serves only TLS), found %q", field, get.Scheme)
	}
	if get.Path != path {
		fail("%s path must be %s, found %q", field, path, get.Path)
	}
	if _, ok := containerPort([]corev1.Container{ctr}, get.Port); !ok {
		fail("%s port %s is no port of this container", field, get.Port.String())
	}
}

// imageProblem says what is wrong with an image reference: it must name a tag other than
// latest, or a digest.
func imageProblem(image string) string {
	if image == "" {
		return "image is empty"
	}
	if _, digest, ok := strings.Cut(image, "@"); ok {
		if !strings.HasPrefix(digest, "sha256:") || len(digest) != len("sha256:")+64 {
			return fmt.Sprintf("image %q: the digest is not sha256:<64 hex>", image)
		}
		return ""
	}
	last := image[strings.LastIndex(image, "/")+1:]
	_, tag, ok := strings.Cut(last, ":")
	if !ok || tag == "" {
		return fmt.Sprintf("image %q has no tag (that means :latest): pin a version or a digest", image)
	}
	if tag == "latest" {
		return fmt.Sprintf("image %q: :latest is not a version; pin a version or a digest", image)
	}
	return ""
}
