{{/*
One service's Deployment. Call with a dict:
  root       the chart's context ($)
  name       gateway | ingestion | billing | analytics
  module     the Python module it runs (python -m MODULE)
  grpcPort   its gRPC port, or 0 (analytics serves only /metrics)
  env        its secret settings, as a YAML list of env entries
  autoscaled true when an HPA or a KEDA ScaledObject owns the replica count

Probes: readiness on gRPC health (SERVING only once the service's dependencies are up:
ingestion reports NOT_SERVING while RabbitMQ is unreachable or blocks it, and billing opens
its port only after MongoDB is prepared and its consumer started); liveness on /metrics, so
that a broker or database outage takes a pod out of its Service without restarting it.
Analytics has no gRPC server: both probes are its /metrics.
*/}}
{{- define "sep.deployment" -}}
{{- $root := .root -}}
{{- $values := index $root.Values .name -}}
{{- $component := list $root .name -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "sep.component" $component }}
  labels:
    {{- include "sep.componentLabels" $component | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "sep.selectorLabels" $component | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  template:
    metadata:
      labels:
        {{- include "sep.componentLabels" $component | nindent 8 }}
      annotations:
        # A changed ConfigMap rolls the pods: settings are read once, at start.
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- if eq $root.Values.metrics.mode "annotations" }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $values.metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- end }}
    spec:
      serviceAccountName: {{ include "sep.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      {{- if $root.Values.topologySpread.enabled }}
      topologySpreadConstraints:
        - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
          topologyKey: {{ $root.Values.topologySpread.topologyKey }}
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "sep.selectorLabels" $component | nindent 14 }}
      {{- end }}
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "sep.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", {{ .module | quote }}]
          ports:
            {{- if .grpcPort }}
            - name: grpc
              containerPort: {{ .grpcPort }}
              protocol: TCP
            {{- end }}
            {{- if .httpPort }}
            - name: http
              containerPort: {{ .httpPort }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ $values.metricsPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "sep.component" $component }}
          {{- with .env }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          readinessProbe:
            {{- if .grpcPort }}
            grpc:
              port: {{ .grpcPort }}
            {{- else }}
            httpGet:
              path: /metrics
              port: metrics
            {{- end }}
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 3
          livenessProbe:
            httpGet:
              path: /metrics
              port: metrics
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          startupProbe:
            httpGet:
              path: /metrics
              port: metrics
            periodSeconds: 2
            failureThreshold: 60
          {{- with $values.preStopSleepSeconds }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ . | quote }}]
          {{- end }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        # The root filesystem is read-only; Python and gRPC get a writable /tmp.
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
{{- end -}}
