{{/*
Names. Kubernetes names are at most 63 characters (DNS labels); a suffixed name truncates the
release part, never the suffix, so that two components can never end up with the same name.
*/}}
{{- define "moe-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moe-cluster.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>" in at most `max` characters. Usage: (dict "ctx" $ "suffix" "x" "max" 63) */}}
{{- define "moe-cluster.suffixedName" -}}
{{- $keep := sub .max (add1 (len .suffix)) | int -}}
{{- printf "%s-%s" (include "moe-cluster.fullname" .ctx | trunc $keep | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "moe-cluster.router.fullname" -}}
{{- include "moe-cluster.suffixedName" (dict "ctx" . "suffix" "router" "max" 63) -}}
{{- end -}}

{{/*
The StatefulSet's name is at most 52 characters: its pods carry a controller-revision-hash label
"<name>-<10-character hash>", and label values are limited to 63.
*/}}
{{- define "moe-cluster.expertWorker.fullname" -}}
{{- include "moe-cluster.suffixedName" (dict "ctx" . "suffix" "expert-worker" "max" 52) -}}
{{- end -}}

{{- define "moe-cluster.expertWorker.headlessName" -}}
{{- include "moe-cluster.suffixedName" (dict "ctx" . "suffix" "expert-worker-headless" "max" 63) -}}
{{- end -}}

{{- define "moe-cluster.models.claimName" -}}
{{- with .Values.model.storage.pvc.existingClaim -}}
{{- . -}}
{{- else -}}
{{- include "moe-cluster.suffixedName" (dict "ctx" . "suffix" "models" "max" 63) -}}
{{- end -}}
{{- end -}}

{{- define "moe-cluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moe-cluster.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moe-cluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels. Selectors hold only the immutable ones: name and instance, plus the component where one
release has two workloads (the router's Deployment must not select the workers' pods).
*/}}
{{- define "moe-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Usage: (dict "ctx" $ "component" "router") */}}
{{- define "moe-cluster.componentSelectorLabels" -}}
{{ include "moe-cluster.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of a resource. Usage: (dict "ctx" $ "component" "router"), component optional. */}}
{{- define "moe-cluster.labels" -}}
helm.sh/chart: {{ include "moe-cluster.chart" .ctx }}
{{ include "moe-cluster.selectorLabels" .ctx }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/part-of: moe-cluster
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The label selector the router watches worker pods with (router --selector). */}}
{{- define "moe-cluster.expertWorker.selectorString" -}}
{{- $labels := include "moe-cluster.componentSelectorLabels" (dict "ctx" . "component" "expert-worker") | fromYaml -}}
{{- $pairs := list -}}
{{- range $key := keys $labels | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $key (get $labels $key)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{- define "moe-cluster.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Folder of the model inside the containers. */}}
{{- define "moe-cluster.modelDir" -}}
{{- printf "/models/%s" (required "model.path is required: the model's folder on the model volume, e.g. --set model.path=Qwen1.5-MoE-A2.7B" .Values.model.path) -}}
{{- end -}}

{{/*
Cross-value checks that a JSON schema cannot express; every template includes this, so a bad
combination fails the render with one readable message.
*/}}
{{- define "moe-cluster.validate" -}}
{{- $v := .Values -}}
{{- if and $v.tls.enabled (eq $v.probes.type "grpc") -}}
{{- fail "tls.enabled needs probes.type=exec: the kubelet's gRPC probe cannot speak TLS" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.serverSecret) -}}
{{- fail "tls.enabled needs tls.serverSecret: a kubernetes.io/tls Secret with the server certificate and key" -}}
{{- end -}}
{{- if and (eq $v.model.storage.type "hostPath") (not $v.model.storage.hostPath.path) -}}
{{- fail "model.storage.type=hostPath needs model.storage.hostPath.path: the node directory holding the models" -}}
{{- end -}}
{{- $w := $v.expertWorkers -}}
{{- if $w.autoscaling.enabled -}}
{{- if or (mod (int $w.autoscaling.minReplicas) (int $w.numShards)) (mod (int $w.autoscaling.maxReplicas) (int $w.numShards)) -}}
{{- fail (printf "expertWorkers.autoscaling.minReplicas (%v) and maxReplicas (%v) must be multiples of expertWorkers.numShards (%v), so that every shard is served equally" $w.autoscaling.minReplicas $w.autoscaling.maxReplicas $w.numShards) -}}
{{- end -}}
{{- if gt (int $w.autoscaling.minReplicas) (int $w.autoscaling.maxReplicas) -}}
{{- fail "expertWorkers.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if eq $v.router.discovery "static" -}}
{{- fail "expertWorkers.autoscaling.enabled needs router.discovery=kubernetes: a static worker list cannot follow the autoscaler" -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.router.discovery "kubernetes") (not $v.rbac.create) (not $v.serviceAccount.name) -}}
{{- fail "router.discovery=kubernetes needs rbac.create=true, or serviceAccount.name of an account allowed to get, list and watch pods" -}}
{{- end -}}
{{- end -}}

{{/* Number of worker pods without autoscaling. */}}
{{- define "moe-cluster.expertWorker.replicas" -}}
{{- mul .Values.expertWorkers.numShards .Values.expertWorkers.replicasPerShard -}}
{{- end -}}

{{/* --grace of a process: its pod's termination grace period less 5 s for the exit, at least 1. */}}
{{- define "moe-cluster.drainSeconds" -}}
{{- max 1 (sub (int .) 5) -}}
{{- end -}}

{{/*
TLS and auth command-line flags of router and workers. The servers refuse to start without TLS
unless told --insecure, so a chart without tls.enabled says so explicitly.
*/}}
{{- define "moe-cluster.securityArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/moe-cluster/tls/tls.crt
- --tls-key
- /etc/moe-cluster/tls/tls.key
- --tls-ca
- /etc/moe-cluster/tls-ca/ca.crt
{{- else }}
- --insecure
{{- end }}
{{- if .Values.auth.tokenSecret }}
- --auth-token-file
- /etc/moe-cluster/auth/token
{{- end }}
{{- end -}}

{{/* Volumes of the router and worker pods: model weights, then the common ones. */}}
{{- define "moe-cluster.volumes" -}}
{{- $storage := .Values.model.storage -}}
- name: models
{{- if eq $storage.type "hostPath" }}
  hostPath:
    path: {{ $storage.hostPath.path }}
    type: {{ $storage.hostPath.type }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "moe-cluster.models.claimName" . }}
    readOnly: {{ $storage.readOnly }}
{{- end }}
{{ include "moe-cluster.commonVolumes" (dict "ctx" . "server" true) }}
{{- end -}}

{{/*
Volumes every pod has: /tmp, then the TLS material and auth token when enabled. Servers get their
certificate and key; the test pod (a client) only the CA and the token.
Usage: (dict "ctx" $ "server" true)
*/}}
{{- define "moe-cluster.commonVolumes" -}}
{{- $v := .ctx.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmpSizeLimit }}
{{- if and $v.tls.enabled .server }}
- name: tls
  secret:
    secretName: {{ $v.tls.serverSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if $v.tls.enabled }}
- name: tls-ca
  secret:
    secretName: {{ default $v.tls.serverSecret $v.tls.caSecret }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if $v.auth.tokenSecret }}
- name: auth-token
  secret:
    secretName: {{ $v.auth.tokenSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.auth.tokenKey }}
        path: token
{{- end }}
{{- end -}}

{{- define "moe-cluster.volumeMounts" -}}
- name: models
  mountPath: /models
  readOnly: {{ .Values.model.storage.readOnly }}
{{ include "moe-cluster.commonVolumeMounts" (dict "ctx" . "server" true) }}
{{- end -}}

{{/* Usage: (dict "ctx" $ "server" true) */}}
{{- define "moe-cluster.commonVolumeMounts" -}}
{{- $v := .ctx.Values -}}
- name: tmp
  mountPath: /tmp
{{- if and $v.tls.enabled .server }}
- name: tls
  mountPath: /etc/moe-cluster/tls
  readOnly: true
{{- end }}
{{- if $v.tls.enabled }}
- name: tls-ca
  mountPath: /etc/moe-cluster/tls-ca
  readOnly: true
{{- end }}
{{- if $v.auth.tokenSecret }}
- name: auth-token
  mountPath: /etc/moe-cluster/auth
  readOnly: true
{{- end }}
{{- end -}}

{{/* Environment of every container: a writable HOME on the read-only root filesystem. */}}
{{- define "moe-cluster.commonEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
{{- end -}}

{{- define "moe-cluster.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "moe-cluster.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end -}}

{{/* Container resources: the component's CPU/memory plus its GPUs as request and limit. */}}
{{- define "moe-cluster.gpuResources" -}}
{{- $gpu := dict .ctx.Values.gpu.resourceName (.gpus | int) -}}
{{- $requests := merge (deepCopy $gpu) (dig "requests" dict .resources) -}}
{{- $limits := merge (deepCopy $gpu) (dig "limits" dict .resources) -}}
{{- toYaml (dict "requests" $requests "limits" $limits) -}}
{{- end -}}

{{/*
A grpc.health.v1 client for exec probes: exits 0 when the server on 127.0.0.1:PORT answers
SERVING. Arguments: port, timeout in seconds. With TLS it presents the server's own certificate
(for servers that require client certificates) and verifies the server against the CA.
*/}}
{{- define "moe-cluster.healthProbeScript" -}}
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
target = "127.0.0.1:" + sys.argv[1]
{{- if .Values.tls.enabled }}
def read(path):
    with open(path, "rb") as f:
        return f.read()
creds = grpc.ssl_channel_credentials(
    read("/etc/moe-cluster/tls-ca/ca.crt"),
    read("/etc/moe-cluster/tls/tls.key"),
    read("/etc/moe-cluster/tls/tls.crt"),
)
name = {{ default "localhost" .Values.tls.probeServerName | quote }}
channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
{{- else }}
channel = grpc.insecure_channel(target)
{{- end }}
reply = health_pb2_grpc.HealthStub(channel).Check(
    health_pb2.HealthCheckRequest(), timeout=0.8 * float(sys.argv[2])
)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
{{- end -}}

{{/*
Startup, liveness and readiness probes on the gRPC health service.
Usage: (dict "ctx" $ "port" 50051 "probes" .Values.router.probes)
*/}}
{{- define "moe-cluster.probes" -}}
{{- $ctx := .ctx -}}
{{- $port := .port -}}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $p := get $.probes $kind }}
{{ $kind }}Probe:
  {{- if eq $ctx.Values.probes.type "grpc" }}
  grpc:
    port: {{ $port }}
  {{- else }}
  exec:
    command:
      - python
      - -c
      - {{ include "moe-cluster.healthProbeScript" $ctx | toYaml | indent 8 | trim }}
      - {{ $port | quote }}
      - {{ $p.timeoutSeconds | quote }}
  {{- end }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
  {{- if ne $kind "startup" }}
  successThreshold: 1
  {{- end }}
{{- end }}
{{- end -}}

{{/* PodDisruptionBudget spec limits. Usage: (dict "pdb" .Values.router.pdb) */}}
{{- define "moe-cluster.pdbLimits" -}}
{{- if .pdb.minAvailable -}}
minAvailable: {{ .pdb.minAvailable }}
{{- else -}}
maxUnavailable: {{ .pdb.maxUnavailable }}
{{- end -}}
{{- end -}}

{{/* host:port of every worker pod, for router.discovery=static. */}}
{{- define "moe-cluster.expertWorker.addresses" -}}
{{- $sts := include "moe-cluster.expertWorker.fullname" . -}}
{{- $svc := include "moe-cluster.expertWorker.headlessName" . -}}
{{- $addresses := list -}}
{{- range $k := until (include "moe-cluster.expertWorker.replicas" . | int) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%v" $sts $k $svc $.Release.Namespace $.Values.clusterDomain $.Values.expertWorkers.ports.grpc) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}
