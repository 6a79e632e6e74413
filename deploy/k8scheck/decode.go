package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// Object is one decoded manifest document.
type Object struct {
	File string
	GVK  schema.GroupVersionKind
	Meta *metav1.ObjectMeta
	// A *corev1.ConfigMap, *appsv1.Deployment, ..., or a *ClusterSPIFFEID.
	Value any
}

// Where names the object in messages: "deployment.yaml: Deployment tasklease/tasklease".
func (o Object) Where() string {
	name := o.Meta.Name
	if o.Meta.Namespace != "" {
		name = o.Meta.Namespace + "/" + name
	}
	return fmt.Sprintf("%s: %s %s", o.File, o.GVK.Kind, name)
}

// The only API groups the tasklease manifests use. Anything else fails to decode ("no kind is
// registered"), so a typo in apiVersion or kind is an error, not a skipped object.
func newDecoder() runtime.Decoder {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme, networkingv1.AddToScheme,
	} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
	// Strict: unknown fields, duplicate keys and field names that match only when case is
	// ignored are errors (apimachinery's strict serializer: YAMLToJSONStrict, then
	// sigs.k8s.io/json UnmarshalStrict).
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}

// Kustomization is the part of kustomize's file format these manifests use.
type Kustomization struct {
	APIVersion string           `json:"apiVersion"`
	Kind       string           `json:"kind"`
	Resources  []string         `json:"resources"`
	Images     []KustomizeImage `json:"images,omitempty"`
}

// KustomizeImage is an `images:` entry (`kustomize edit set image`).
type KustomizeImage struct {
	Name    string `json:"name"`
	NewName string `json:"newName,omitempty"`
	NewTag  string `json:"newTag,omitempty"`
	Digest  string `json:"digest,omitempty"`
}

// strictJSON converts YAML to JSON refusing duplicate keys, then decodes it into v refusing
// unknown fields, duplicate fields and case-insensitive matches: the decoding apimachinery's
// strict serializer applies to the built-in types.
func strictJSON(doc []byte, v any) error {
	data, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strictErrs, err := kjson.UnmarshalStrict(data, v)
	if err != nil {
		return err
	}
	if len(strictErrs) > 0 {
		msgs := make([]string, len(strictErrs))
		for i, e := range strictErrs {
			msgs[i] = e.Error()
		}
		return fmt.Errorf("strict decoding error: %s", strings.Join(msgs, ", "))
	}
	return nil
}

func readKustomization(dir string) (*Kustomization, error) {
	data, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		return nil, err
	}
	var k Kustomization
	if err := strictJSON(data, &k); err != nil {
		return nil, fmt.Errorf("kustomization.yaml: %w", err)
	}
	return &k, nil
}

// decodeFile decodes every YAML document of one manifest file into its typed object.
func decodeFile(dir, name string, decoder runtime.Decoder) ([]Object, []string) {
	data, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return nil, []string{fmt.Sprintf("%s: %v", name, err)}
	}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var objects []Object
	var problems []string
	for index := 0; ; index++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: document %d: %v", name, index, err))
			break
		}
		object, problem := decodeDocument(name, index, doc, decoder)
		if problem != "" {
			problems = append(problems, problem)
		} else if object != nil {
			objects = append(objects, *object)
		}
	}
	if len(objects) == 0 && len(problems) == 0 {
		problems = append(problems, fmt.Sprintf("%s: no Kubernetes object in the file", name))
	}
	return objects, problems
}

func decodeDocument(file string, index int, doc []byte, decoder runtime.Decoder) (*Object, string) {
	where := fmt.Sprintf("%s: document %d", file, index)
	data, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, fmt.Sprintf("%s: %v", where, err)
	}
	if bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
		return nil, "" // only comments or an empty document
	}
	var typeMeta metav1.TypeMeta
	if err := json.Unmarshal(data, &typeMeta); err != nil {
		return nil, fmt.Sprintf("%s: %v", where, err)
	}
	if typeMeta.APIVersion == "" || typeMeta.Kind == "" {
		return nil, fmt.Sprintf("%s: apiVersion and kind are required", where)
	}
	gv, err := schema.ParseGroupVersion(typeMeta.APIVersion)
	if err != nil {
		return nil, fmt.Sprintf("%s: %v", where, err)
	}
	gvk := gv.WithKind(typeMeta.Kind)
	if gv.Group == ClusterSPIFFEIDKind.Group {
		if gvk != ClusterSPIFFEIDKind {
			return nil, fmt.Sprintf("%s: %s is not a known kind of %s (only %s)", where, gvk,
				gv.Group, ClusterSPIFFEIDKind)
		}
		var id ClusterSPIFFEID
		if err := strictJSON(doc, &id); err != nil {
			return nil, fmt.Sprintf("%s (%s): %v", where, gvk.Kind, err)
		}
		return &Object{File: file, GVK: gvk, Meta: &id.ObjectMeta, Value: &id}, ""
	}
	obj, decoded, err := decoder.Decode(doc, nil, nil)
	if err != nil {
		return nil, fmt.Sprintf("%s (%s): %v", where, gvk.Kind, err)
	}
	var meta *metav1.ObjectMeta
	if accessor, ok := obj.(metav1.ObjectMetaAccessor); ok {
		meta, _ = accessor.GetObjectMeta().(*metav1.ObjectMeta)
	}
	if meta == nil {
		return nil, fmt.Sprintf("%s: %s has no object metadata", where, decoded.Kind)
	}
	return &Object{File: file, GVK: *decoded, Meta: meta, Value: obj}, ""
}

// loadDir reads kustomization.yaml and decodes every resource it lists; it also refuses
// manifests in the directory that the kustomization leaves out (they would never be applied).
func loadDir(dir string) (*Kustomization, []Object, []string) {
	k, err := readKustomization(dir)
	if err != nil {
		return nil, nil, []string{err.Error()}
	}
	var problems []string
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		problems = append(problems, fmt.Sprintf(
			"kustomization.yaml: apiVersion/kind %s/%s, expected kustomize.config.k8s.io/v1beta1/Kustomization",
			k.APIVersion, k.Kind))
	}
	if len(k.Resources) == 0 {
		problems = append(problems, "kustomization.yaml: no resources listed")
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, []string{err.Error()}
	}
	listed := map[string]bool{}
	for _, resource := range k.Resources {
		clean := filepath.Clean(resource)
		if listed[clean] {
			problems = append(problems, fmt.Sprintf("kustomization.yaml: %s is listed twice", resource))
		}
		listed[clean] = true
		if filepath.IsAbs(clean) || strings.HasPrefix(clean, "..") || strings.Contains(resource, "://") {
			problems = append(problems, fmt.Sprintf(
				"kustomization.yaml: resource %s is outside this directory", resource))
		}
	}
	for _, entry := range entries {
		name := entry.Name()
		if entry.IsDir() || name == "kustomization.yaml" {
			continue
		}
		if (strings.HasSuffix(name, ".yaml") || strings.HasSuffix(name, ".yml")) && !listed[name] {
			problems = append(problems, fmt.Sprintf(
				"%s: not listed in kustomization.yaml resources (it would never be applied)", name))
		}
	}
	decoder := newDecoder()
	var objects []Object
	for _, resource := range k.Resources {
		decodedObjects, decodeProblems := decodeFile(dir, filepath.Clean(resource), decoder)
		objects = append(objects, decodedObjects...)
		problems = append(problems, decodeProblems...)
	}
	return k, objects, problems
}
